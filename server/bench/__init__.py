"""What measures or shows the server: search, encoding, upgrade and load benchmarks, the release check and the demo."""
