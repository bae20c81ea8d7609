"""Likeness tracking's image work: probe image statistics, the side-by-side grid and the score
chart. Pure functions of bytes and numbers; the service (``services.likeness``) stores the results."""
