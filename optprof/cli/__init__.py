"""The command line: one module per command, every option declared once (options.py), the app assembled in
app.py. The only layer that prints and exits."""
