"""Small shared helpers: atomic files, input checks, fingerprints, progress bars, devices."""
