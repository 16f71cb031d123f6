"""A request body to one model's input: decoded once, then checked and cast per arm's signature."""
