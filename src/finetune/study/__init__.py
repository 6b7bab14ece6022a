"""The report of a sweep and the depth study's verdict: run folders, statistics, tables, plots, the HTML page."""
