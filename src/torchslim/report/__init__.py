"""Compression reports: report.json (one fixed shape), report.md and plots."""

from .report import build_report, measure, write_report

__all__ = ["build_report", "measure", "write_report"]
