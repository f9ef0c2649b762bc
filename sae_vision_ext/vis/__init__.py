"""Feature visualisation: streaming statistics, top-activating patches with heatmaps, dashboards."""
