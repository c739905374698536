"""forgeline's engine: plain Python, no Dagster. Every stage is callable and testable on its own;
``assets/`` only wires these functions into the Dagster graph."""
