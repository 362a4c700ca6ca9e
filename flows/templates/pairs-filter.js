(function () {
  "use strict";
  var form = document.getElementById("filters");
  var rows = Array.prototype.slice.call(document.querySelectorAll("#pairs tbody tr"));
  var texts = rows.map(function (row) { return row.textContent.toLowerCase(); });
  var fields = ["principle", "iteration", "min_p", "q"];
  function fromHash() {
    var params = new URLSearchParams(location.hash.slice(1));
    fields.forEach(function (name) {
      if (params.has(name)) { form.elements[name].value = params.get(name); }
    });
  }
  function apply() {
    var principle = form.elements.principle.value;
    var iteration = form.elements.iteration.value;
    var min = parseFloat(form.elements.min_p.value) || 0;
    var needle = form.elements.q.value.trim().toLowerCase();
    var shown = 0;
    rows.forEach(function (row, i) {
      var keep = (!principle || row.dataset.principles.split(" ").indexOf(principle) >= 0) &&
        (!iteration || row.dataset.iteration === iteration) &&
        !(parseFloat(row.dataset.p) < min) &&
        (!needle || texts[i].indexOf(needle) >= 0);
      row.hidden = !keep;
      if (keep) { shown += 1; }
    });
    var status = document.getElementById("shown");
    status.textContent = shown + " of " + rows.length + " pairs shown";
    status.setAttribute("data-filtered", "yes");
  }
  function save() {
    var params = new URLSearchParams();
    fields.forEach(function (name) {
      var value = form.elements[name].value;
      if (value && !(name === "min_p" && parseFloat(value) === 0)) { params.set(name, value); }
    });
    try { history.replaceState(null, "", "#" + params.toString()); } catch (e) { /* kept */ }
  }
  form.addEventListener("input", function () { apply(); save(); });
  form.addEventListener("submit", function (event) { event.preventDefault(); });
  window.addEventListener("hashchange", function () { fromHash(); apply(); });
  fromHash();
  apply();
})();
