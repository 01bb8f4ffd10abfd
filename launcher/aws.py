"""boto3 sessions and clients, and the translation of AWS failures into AWSError.

Plain boto3 (not the SageMaker SDK) for everything after submission: describe, stop,
logs, S3. `AWS_ENDPOINT_URL` is honoured by boto3 itself, which is how the tests point
every client at a local moto server.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from functools import lru_cache

from launcher.errors import AWSError

RETRY = {"max_attempts": 8, "mode": "adaptive"}


@lru_cache(maxsize=8)
def session(region: str | None = None, profile: str | None = None):
    import boto3

    try:
        return boto3.Session(region_name=region, profile_name=profile)
    except Exception as exc:  # botocore.exceptions.ProfileNotFound and friends
        raise AWSError(f"could not open an AWS session: {exc}", "check `aws configure list`") from None


def client(service: str, region: str | None = None, profile: str | None = None):
    from botocore.config import Config

    with translated(f"open a {service} client"):
        return session(region, profile).client(service, config=Config(retries=RETRY, user_agent_extra="sm-qlora"))


HINTS = {
    "AccessDenied": "the credentials lack a permission: see the README's IAM section",
    "AccessDeniedException": "the credentials lack a permission: see the README's IAM section",
    "ResourceLimitExceeded": "raise the instance quota (Service Quotas > SageMaker > '<instance> for training job usage') or pick another instance",
    "ThrottlingException": "AWS throttled the calls even after retries; try again in a minute",
    "ExpiredToken": "refresh your credentials (aws sso login, or new keys)",
    "ExpiredTokenException": "refresh your credentials (aws sso login, or new keys)",
    "UnrecognizedClientException": "the credentials are not valid for this account/region",
    "ValidationException": "SageMaker rejected a field of the request; run `sm-qlora launch --dry-run` to see it",
}


@contextlib.contextmanager
def translated(action: str) -> Iterator[None]:
    """Run AWS calls; botocore failures become AWSError (exit 3) with a hint."""
    from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

    try:
        yield
    except NoCredentialsError:
        raise AWSError(f"{action}: no AWS credentials found",
                       "run `aws configure` or set AWS_PROFILE / AWS_ACCESS_KEY_ID") from None
    except ClientError as exc:
        err = exc.response.get("Error", {})
        code = err.get("Code", "Unknown")
        raise AWSError(f"{action}: {code}: {err.get('Message', exc)}", HINTS.get(code)) from None
    except BotoCoreError as exc:
        hint = "pass --region or set AWS_REGION" if "region" in str(exc).lower() else "check the network and the region"
        raise AWSError(f"{action}: {exc}", hint) from None


def is_not_found(exc: Exception) -> bool:
    from botocore.exceptions import ClientError

    if not isinstance(exc, ClientError):
        return False
    code = exc.response.get("Error", {}).get("Code", "")
    msg = exc.response.get("Error", {}).get("Message", "")
    return code in ("404", "NoSuchKey", "NotFound", "ResourceNotFound") or (
        code == "ValidationException" and "not found" in msg.lower()
    )


def split_s3(uri: str) -> tuple[str, str]:
    rest = uri[len("s3://"):]
    bucket, _, key = rest.partition("/")
    return bucket, key
