"""Champion/challenger router: serves two MLflow registry aliases side by side."""
