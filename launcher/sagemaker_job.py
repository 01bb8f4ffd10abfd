"""The SageMaker backend of a `Job`: DescribeTrainingJob, StopTrainingJob, the job's
CloudWatch streams and its adapter under the S3 output path, through plain boto3."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from launcher.aws import client, is_not_found, split_s3, translated
from launcher.errors import AWSError
from launcher.logs import TERMINAL, CloudWatchSource

Fetch = Callable[[Path], None]


class SageMakerBackend:
    local = False

    def __init__(self, name: str, region: str, profile: str | None = None, output_s3_uri: str | None = None):
        self.name = name
        self.region = region
        self.profile = profile
        self.output_s3_uri = output_s3_uri  # <output.s3_uri>/jobs when this session launched the job

    def _sm(self):
        return client("sagemaker", self.region, self.profile)

    def describe(self) -> dict[str, Any]:
        from botocore.exceptions import ClientError

        with translated(f"describe {self.name}"):  # no credentials as much as a refusal: exit 3
            try:
                return self._sm().describe_training_job(TrainingJobName=self.name)
            except ClientError as exc:
                if is_not_found(exc):
                    raise AWSError(f"no training job named {self.name} in {self.region}",
                                   f"sm-qlora list --region {self.region} shows the recent ones") from None
                raise

    def stop(self) -> bool:
        if self.describe()["TrainingJobStatus"] in TERMINAL:
            return False
        with translated(f"stop {self.name}"):
            self._sm().stop_training_job(TrainingJobName=self.name)
        return True

    def log_source(self) -> CloudWatchSource:
        return CloudWatchSource(self.name, client("logs", self.region, self.profile))

    def adapter_uri(self, desc: dict | None) -> str | None:
        """Uncompressed output (disable_output_compression) puts the adapter's files under
        <S3OutputPath>/<job>/output/model/."""
        output = self.output_s3_uri or (desc or {}).get("OutputDataConfig", {}).get("S3OutputPath")
        return f"{output.rstrip('/')}/{self.name}/output/model/" if output else None

    def artifacts(self, adapter_uri: str) -> list[tuple[str, Fetch]]:
        """(path relative to the adapter, how to fetch it to a local path) per file."""
        bucket, prefix = split_s3(adapter_uri)
        s3 = client("s3", self.region, self.profile)
        out: list[tuple[str, Fetch]] = []
        with translated(f"list {adapter_uri}"):
            for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
                for obj in page.get("Contents", []):
                    rel = obj["Key"][len(prefix):].lstrip("/")
                    if rel and not rel.endswith("/"):
                        out.append((rel, _downloader(s3, bucket, obj["Key"], adapter_uri)))
        return out

    def default_plot_path(self) -> Path:
        return Path(f"{self.name}-loss.png")

    def console_url(self) -> str:
        r = self.region
        return f"https://{r}.console.aws.amazon.com/sagemaker/home?region={r}#/jobs/{self.name}"


def _downloader(s3, bucket: str, key: str, adapter_uri: str) -> Fetch:
    def fetch(target: Path) -> None:
        with translated(f"download {adapter_uri}"):
            s3.download_file(bucket, key, str(target))

    return fetch


def list_sagemaker_jobs(region: str, profile: str | None, max_results: int) -> list[dict[str, Any]]:
    sm = client("sagemaker", region, profile)
    with translated("list training jobs"):
        page = sm.list_training_jobs(SortBy="CreationTime", SortOrder="Descending", MaxResults=min(max_results, 100))
    return [{"job_name": j["TrainingJobName"], "status": j["TrainingJobStatus"], "where": "sagemaker",
             "created": j["CreationTime"].timestamp()} for j in page["TrainingJobSummaries"]]
