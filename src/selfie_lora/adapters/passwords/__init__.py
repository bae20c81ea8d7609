"""Password hashing (argon2-cffi)."""
