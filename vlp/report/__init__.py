"""Static HTML run reports: ``write_report(run_dir)`` writes ``<run_dir>/report.html``."""

from vlp.report.html import SECTIONS, write_report

__all__ = ["write_report", "SECTIONS"]
