// protopnet serve: drop a picture on the form, or choose one, and it is sent at once.
(function () {
  var form = document.getElementById("upload");
  var input = document.getElementById("image");
  if (!form || !input) { return; }
  function send() { if (input.files && input.files.length) { form.submit(); } }
  input.addEventListener("change", send);
  ["dragenter", "dragover"].forEach(function (name) {
    document.addEventListener(name, function (event) { event.preventDefault(); form.classList.add("dragging"); });
  });
  ["dragleave", "drop"].forEach(function (name) {
    document.addEventListener(name, function (event) { event.preventDefault(); form.classList.remove("dragging"); });
  });
  document.addEventListener("drop", function (event) {
    if (event.dataTransfer && event.dataTransfer.files && event.dataTransfer.files.length) {
      input.files = event.dataTransfer.files;
      send();
    }
  });
}());

// Trying an edit re-fits the last layer over the training data: say so while it runs.
(function () {
  var form = document.getElementById("edit-form");
  var button = document.getElementById("edit-button");
  if (!form || !button) { return; }
  form.addEventListener("submit", function () {
    button.disabled = true;
    button.textContent = "Measuring and re-fitting\u2026 (this can take a while on a large dataset)";
  });
}());
