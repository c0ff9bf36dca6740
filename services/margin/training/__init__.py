"""The TrainingJobs service: estimate, submit, watch and cancel training runs that Celery workers execute."""
