"""The service domain: settings, the artifact store, the job queue and the SQL store."""
