// The console's own script: copy buttons and the usage chart. Loaded from /console/static (the pages'
// Content-Security-Policy allows no inline script); the pages work without it, minus those two.
(function () {
  "use strict";

  function copy(button) {
    var field = document.getElementById(button.getAttribute("data-copy"));
    var status = document.querySelector('[data-copied-for="' + field.id + '"]');
    var done = function () { if (status) { status.textContent = "Copied"; } };
    field.select();
    if (navigator.clipboard && window.isSecureContext) {
      navigator.clipboard.writeText(field.value).then(done, function () { document.execCommand("copy"); done(); });
    } else {
      document.execCommand("copy");
      done();
    }
  }

  // Distinct, colour-blind-friendly hues (Okabe-Ito, then Tableau's), repeated past them.
  var PALETTE = ["#0072b2", "#e69f00", "#009e73", "#cc79a7", "#56b4e9", "#d55e00", "#f0e442", "#000000",
                 "#4e79a7", "#f28e2b", "#59a14f", "#b07aa1", "#9c755f", "#76b7b2", "#edc948", "#ff9da7"];

  function drawUsage() {
    var canvas = document.getElementById("usage-chart");
    var source = document.getElementById("usage-chart-data");
    if (!canvas || !source || typeof window.Chart === "undefined") { return; }
    var data = JSON.parse(source.textContent);
    window.Chart.defaults.color = "#1b1f24";  // the page's text colour: Chart.js's grey is too faint
    data.datasets.forEach(function (set, i) {
      set.backgroundColor = PALETTE[i % PALETTE.length];
      set.borderWidth = 0;
    });
    new window.Chart(canvas, {
      type: "bar",
      data: data,
      options: {
        animation: false,
        maintainAspectRatio: false,
        scales: { x: { stacked: true }, y: { stacked: true, beginAtZero: true, title: { display: true, text: "tokens" } } },
        plugins: { legend: { position: "bottom" } }
      }
    });
  }

  document.addEventListener("click", function (event) {
    var button = event.target.closest("[data-copy]");
    if (button) { copy(button); }
  });
  if (document.readyState === "loading") {
    document.addEventListener("DOMContentLoaded", drawUsage);
  } else {
    drawUsage();
  }
})();
