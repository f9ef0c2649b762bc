// d3-selection 3 (the copy d3 7 uses) plus the `event` binding d3-jetpack 2.3.0's attachTooltip
// still imports from d3 5; bundled by `npm run build` so jetpack patches d3 7's own selection.
export * from "./node_modules/d3-selection/src/index.js";
export const event = null;
