"""What the three services share: settings, errors, the artifact store, the CLI."""
