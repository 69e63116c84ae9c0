"""Monthly and quarterly reports: Plan 348 targets and the Decision 766 groups, as PDF, XLSX, CSV or JSON."""
