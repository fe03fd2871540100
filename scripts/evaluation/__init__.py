"""Evaluation: metrics with intervals, the BI-RADS baseline, the summary and the report."""
