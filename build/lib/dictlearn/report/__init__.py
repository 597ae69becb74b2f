"""What people look at: tables, plots, token display, and the HTML pages."""
