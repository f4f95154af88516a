"""The final line `lorafleet submit` prints for a job, from the JobDetails Ray's Job SDK returns."""

from ray.job_submission import JobDetails, JobStatus

from jobs.submit import outcome


def _details(status: JobStatus, message: str | None, error_type: str | None = None) -> JobDetails:
    return JobDetails(type="SUBMISSION", entrypoint="python -m jobs.train", status=status, message=message, error_type=error_type)


def test_a_job_whose_runtime_env_failed_shows_the_whole_reason():
    """Such a job has no logs to stream: Ray's message is all the user gets."""
    message = "runtime_env setup failed: Failed to set up runtime environment.\nOSError: [Errno 28] No space left on device"
    line = outcome("raysubmit_1", _details(JobStatus.FAILED, message, "RUNTIME_ENV_SETUP_FAILURE"))
    assert line == f"job raysubmit_1: FAILED: {message}"


def test_an_entrypoint_failure_shows_only_the_first_line_of_the_message():
    """Ray appends the last 20,000 characters of the logs, which were streamed already."""
    message = "Job entrypoint command failed with exit code 1, last available logs (truncated to 20,000 chars):\nTraceback ..."
    line = outcome("raysubmit_2", _details(JobStatus.FAILED, message, "JOB_ENTRYPOINT_COMMAND_ERROR"))
    assert line == "job raysubmit_2: FAILED: Job entrypoint command failed with exit code 1, last available logs (truncated to 20,000 chars):"


def test_a_successful_or_silent_job_is_its_status():
    assert outcome("raysubmit_3", _details(JobStatus.SUCCEEDED, "Job finished successfully.")) == "job raysubmit_3: SUCCEEDED"
    assert outcome("raysubmit_4", _details(JobStatus.STOPPED, None)) == "job raysubmit_4: STOPPED"
