"""Reporting: the per-tick status line and stats records, metrics at snapshots, run health, trackers, report.html."""
