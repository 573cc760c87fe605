"""The practice console at /console/ for a practice's admins (see gateway/console/routes.py)."""
