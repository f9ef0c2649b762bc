// Served for transformer-circuits.pub's jetpack_2024-07-20.js, which is not on npm: that file is its
// authors' d3 7 port of d3-jetpack. The d3 bundle served for their d3.js already holds npm
// d3-jetpack 2.3.0 (built by `npm run build`); this adds what circuit-tracer's frontend uses from
// the port and 2.3.0 lacks or does differently under d3 7.
(function () {
  var conventions = d3.conventions
  // the port's conventions object also draws its own axes
  d3.conventions = function (c) {
    c = conventions(c)
    c.drawAxis = function (svg) {
      svg = svg || c.svg
      var xAxisSel = svg.append('g').attr('class', 'x axis')
        .attr('transform', 'translate(0,' + c.height + ')').call(c.xAxis)
      var yAxisSel = svg.append('g').attr('class', 'y axis').call(c.yAxis)
      return {xAxisSel: xAxisSel, yAxisSel: yAxisSel}
    }
    return c
  }
  // d3 7 calls listeners with (event, datum); 2.3.0's tooltip expects d3 5's (datum) and d3.event
  d3.attachTooltip = function (sel, tooltipSel, fieldFns) {
    if (!sel.size()) return
    tooltipSel = tooltipSel || d3.select('.tooltip')
    var datum = sel.datum()
    fieldFns = fieldFns || Object.keys(datum)
      .filter(function (k) { return typeof datum[k] != 'object' })
      .map(function (k) { return function (d) { return k + ': <b>' + d[k] + '</b>' } })
    sel
      .on('mouseover.attachTooltip', function (event, d) {
        tooltipSel.classed('tooltip-hidden', false).html('')
          .appendMany('div', fieldFns).html(function (fn) { return fn(d) })
        d3.select(this).classed('tooltipped', true)
      })
      .on('mousemove.attachTooltip', function (event) {
        if (!tooltipSel.size()) return
        var box = tooltipSel.node().getBoundingClientRect()
        var left = d3.clamp(20, event.clientX - box.width / 2, window.innerWidth - box.width - 20)
        var top = innerHeight > event.clientY + 20 + box.height ? event.clientY + 20 : event.clientY - box.height - 20
        tooltipSel.style('left', left + 'px').style('top', top + 'px')
      })
      .on('mouseout.attachTooltip', function () {
        tooltipSel.classed('tooltip-hidden', true)
        d3.selectAll('.tooltipped').classed('tooltipped', false)
      })
  }
})()
