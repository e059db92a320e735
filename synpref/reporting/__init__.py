"""Reporting: Table 1, figures, replies side by side, study tables, the memory planner."""
