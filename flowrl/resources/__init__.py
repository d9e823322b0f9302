"""Data files shipped inside the flowrl wheel (read with `importlib.resources`, never by path).

- `paper_curves.csv.gz`: per-seed success curves of Li & Levine (ICLR 2026), all studies.
- `paper_final_success.csv`: per-(study, key, method) success at 1M offline / end of online.

Provenance and format: `README.md` in this directory. Readers: `flowrl.reference`.
"""
