"""Approvals arrive with the tool-approval issue; the app exists so the layout is fixed from the start."""
