"""semcorr test-suite: tiny models and generated fixtures, nothing downloaded."""
