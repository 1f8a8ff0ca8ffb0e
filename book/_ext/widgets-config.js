// Loaded after require.js and before the ipywidgets HTML manager (see _config.yml: nb_ipywidgets_js).
(function () {
  // 1. The manager finds its fonts next to its own module: map the module id to this folder.
  var src = document.currentScript.src;
  var here = src.slice(0, src.lastIndexOf("/") + 1);
  require.config({ paths: { "@jupyter-widgets/html-manager/dist": here + "html-manager" } });
  // 2. The manager typesets widget labels with MathJax 2's Hub.Queue; the book runs MathJax 3.
  var hub = {
    Queue: function (job) {
      var el = job && job[2];
      if (window.MathJax && window.MathJax.typesetPromise) {
        window.MathJax.typesetPromise(el ? [el] : undefined).catch(function () {});
      }
    },
  };
  function install() {
    if (window.MathJax && !window.MathJax.Hub) { window.MathJax.Hub = hub; }
  }
  install();
  document.addEventListener("DOMContentLoaded", install);
  var tries = 0;
  var timer = setInterval(function () { install(); if (++tries > 100) { clearInterval(timer); } }, 50);
})();
