'use strict';
// The study page's plotly.js: its core with the four trace types the page draws. Parallel coordinates come in
// plotly's "strict" form (precompiled WebGL code), so the page needs no 'unsafe-eval'.
var Plotly = require('plotly.js/lib/core');
Plotly.register([
    require('plotly.js/lib/bar'),
    require('plotly.js/lib/heatmap'),
    require('plotly.js/src/traces/parcoords/strict'),
]);
module.exports = Plotly;
