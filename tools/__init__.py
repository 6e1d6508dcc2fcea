"""Command-line tools that work on the files runs leave behind (result tables and plots)."""
