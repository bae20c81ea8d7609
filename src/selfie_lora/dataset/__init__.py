"""Photo intake: reading uploads safely, preparing photos, and the checks seam."""
