// Builds ../../tune_alexnet/plotly.min.js with plotly.js's own esbuild settings (its esbuild-config.js), from
// entry.js. Run: npm install --ignore-scripts && npm run build
'use strict';
const esbuild = require('esbuild');
const path = require('path');
const { environmentPlugin } = require('esbuild-plugin-environment');
const { glsl } = require('esbuild-plugin-glsl');
const InlineCSSPlugin = require('esbuild-plugin-inline-css');
const version = require('plotly.js/package.json').version;

esbuild.build({
    entryPoints: [path.join(__dirname, 'entry.js')],
    outfile: path.join(__dirname, '..', '..', 'tune_alexnet', 'plotly.min.js'),
    format: 'iife',
    globalName: 'Plotly',
    bundle: true,
    minify: true,
    sourcemap: false,
    legalComments: 'none',
    banner: { js: `/*! plotly.js v${version}: core, bar, heatmap, parcoords (strict). (c) Plotly, Inc. MIT License. Built by tools/plotly/build.js */` },
    plugins: [InlineCSSPlugin(), glsl({ minify: true }), environmentPlugin({ NODE_DEBUG: false })],
    alias: { regl: '@plotly/regl', stream: 'stream-browserify' },
    define: { global: 'window', 'define.amd': 'false' },
    target: 'es2016',
    logLevel: 'warning',
}).then(() => console.log(`plotly.js v${version} -> tune_alexnet/plotly.min.js`));
