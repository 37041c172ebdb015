"""Reports -> text, pictures and pages: rich tables (console, compare, tables, tune, text), matplotlib plots, one
self-contained HTML page. The only layer that formats units, and the only one that imports rich."""
