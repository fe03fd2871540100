"""Engine pieces: handlers, resilience (resume, guards), atomic files and fingerprints."""
