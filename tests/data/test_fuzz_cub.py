"""CUB-200-2011 annotation files fuzzed by *mutation* of a valid tree (with its pictures present),
so the fuzz reaches deep into the parser and the crop / box / part arithmetic: a changed field,
a dropped or duplicated line, odd numbers, odd line endings. Whatever the change, the dataset is
either refused with a one-line ValueError naming the file, or builds and then each item either
loads (a picture of the right size, a box inside it) or raises BadImageError (a ValueError).
(tests/data/test_data_cub.py fuzzes with random tokens; this complements it.)"""

from __future__ import annotations

import atexit
import math
import shutil
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protopnet.data import CUB200, BadImageError

from conftest import FILES, write_tree

_BASE = Path(tempfile.mkdtemp(prefix="fuzz-cub-"))
atexit.register(shutil.rmtree, _BASE, True)
write_tree(_BASE / "valid")

TOKENS = st.sampled_from([
    "0", "1", "-1", "3", "7", "12", "20", "33", "105", "999", "2", "1.5", "-0.0", "1e-320", "1e999", "-1e999", "nan", "inf",
    "99999999999999999999", "0x10", "1_0", "\uff11", "\u0663", "a.png", "003.Sooty_Albatross/a.png", "../a.png", "/a.png",
    "003.Sooty_Albatross/../../x.png", "images/../x.png", "", "\x00", "\ufeff7", "7\r", "𝟕",
])


@st.composite
def mutation(draw):
    name = draw(st.sampled_from(sorted(FILES)))
    lines = FILES[name].splitlines()
    index = draw(st.integers(0, len(lines) - 1))
    fields = lines[index].split(" ")
    op = draw(st.sampled_from(["field", "drop_field", "add_field", "drop_line", "duplicate_line", "blank_line", "crlf", "bom", "tabs", "line"]))
    if op == "field":
        fields[draw(st.integers(0, len(fields) - 1))] = draw(TOKENS)
        lines[index] = " ".join(fields)
    elif op == "drop_field":
        del fields[draw(st.integers(0, len(fields) - 1))]
        lines[index] = " ".join(fields)
    elif op == "add_field":
        lines[index] = " ".join(fields + [draw(TOKENS)])
    elif op == "drop_line":
        del lines[index]
    elif op == "duplicate_line":
        lines.insert(index, lines[index])
    elif op == "blank_line":
        lines.insert(index, draw(st.sampled_from(["", " ", "\t"])))
    elif op == "line":
        lines[index] = draw(st.text(max_size=12))
    text = "\n".join(lines) + "\n"
    if op == "crlf":
        text = text.replace("\n", "\r\n")
    elif op == "bom":
        text = "\ufeff" + text
    elif op == "tabs":
        text = text.replace(" ", "\t")
    return name, text


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(mutation(), min_size=1, max_size=3), st.sampled_from(["train", "test", "all"]), st.sampled_from(["bbox", "full"]))
def test_mutated_annotations_are_refused_clearly_or_give_sane_items(mutations, split, crop):
    root = _BASE / "mutated"
    shutil.rmtree(root, ignore_errors=True)
    shutil.copytree(_BASE / "valid", root)
    for name, text in mutations:
        (root / name).write_text(text, encoding="utf-8")
    size = 16
    try:
        dataset = CUB200(root, split=split, crop=crop, image_size=size)
    except ValueError as error:
        message = str(error)
        assert message.startswith(str(root)) and "\n" not in message, message
        return
    assert len(dataset) == len(dataset.targets) and all(0 <= t < len(dataset.classes) for t in dataset.targets)
    for index in range(len(dataset)):
        try:
            picture = dataset.load_image(index)
            annotation = dataset.annotation(index)
        except BadImageError as error:
            assert "\n" not in str(error)
            continue
        assert picture.size == (size, size) and picture.mode == "RGB"
        if annotation.object_box is not None:
            x0, y0, x1, y1 = annotation.object_box
            assert all(math.isfinite(v) for v in (x0, y0, x1, y1))
            assert 0 <= x0 <= x1 <= size and 0 <= y0 <= y1 <= size, annotation.object_box
        assert all(math.isfinite(x) and math.isfinite(y) for x, y in annotation.parts.values()), annotation.parts
