"""protopnet push-to-hub MODEL_DIR OWNER/NAME [--revision R] [--private] [--license L] [--dry-run]"""

from __future__ import annotations

import argparse
import json
from typing import Any

from .common import CommandError, add_parser


def create_parser(subparsers: Any) -> argparse.ArgumentParser:
    parser = add_parser(
        subparsers,
        "push-to-hub",
        "Publish a model directory to a Hugging Face Hub repository: safetensors, JSON, the prototype pictures and a "
        "model card, never a pickle (needs pip install 'protopnet[hub]' and a token: hf auth login or HF_TOKEN).",
        "protopnet push-to-hub demo-out/model YOUR-NAME/protopnet-demo --dry-run",
    )
    parser.add_argument("model", help="a model directory (written by train, push, prune, edit or ensemble)")
    parser.add_argument("repo_id", metavar="OWNER/NAME", help="the repository (created when missing)")
    parser.add_argument("--revision", help="the branch to commit to (default: main)")
    parser.add_argument("--private", action="store_true", help="create the repository private")
    parser.add_argument("--license", help="the license of the model card's front matter (e.g. mit, cc-by-4.0); left out when not given")
    parser.add_argument("--message", help="the commit message (default: what the model is)")
    parser.add_argument("--create-pr", action="store_true", help="open a pull request instead of committing to the branch")
    parser.add_argument("--dry-run", action="store_true", help="list the files and the commit that would be sent; contact nothing")
    return parser


def execute(args: argparse.Namespace) -> int:
    from ..checkpoint import CheckpointError
    from ..hub import commit_message, parse_repo_id, push_to_hub, upload_operations

    try:
        repo_id = parse_repo_id(args.repo_id)
        if args.dry_run:
            operations = upload_operations(args.model, repo_id=repo_id, license=args.license)
            title, description = commit_message(args.model)
            print(json.dumps({
                "repo_id": repo_id, "revision": args.revision or "main", "commit_message": args.message or title,
                "commit_description": description,
                "files": [{"path": op.path_in_repo, "bytes": op.upload_info.size, "sha256": op.upload_info.sha256.hex()} for op in operations],
            }, indent=1))
            return 0
        info = push_to_hub(args.model, repo_id, revision=args.revision, private=args.private or None, license=args.license,
                           message=args.message, create_pr=args.create_pr)
    except CheckpointError as error:
        raise CommandError(str(error)) from None
    print(json.dumps({"repo_id": repo_id, "commit": getattr(info, "oid", None), "url": str(getattr(info, "commit_url", "")),
                      "pull_request": getattr(info, "pr_url", None), "load_with": f"protopnet.load_model('hf://{repo_id}')"}))
    return 0
