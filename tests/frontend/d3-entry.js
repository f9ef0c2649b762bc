// d3 7 with npm d3-jetpack 2.3.0 as one global object, writable like the d3 builds the frontend
// and jetpack-2024-shim.js expect (an ES module namespace is frozen).
import * as d3 from "./node_modules/d3-jetpack/d3-index.js";

window.d3 = Object.assign({}, d3);
