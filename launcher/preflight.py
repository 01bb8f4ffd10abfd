"""`sm-qlora preflight CONFIG`: every account-side reason a launch would fail or stall,
checked before anything is paid for.

Checks, in order: the credentials and who they are; the role (exists, trusts
sagemaker.amazonaws.com, the caller may iam:PassRole it); the bucket (exists, in the
job's region); the training-instance quota (Service Quotas); the HF token secret (exists,
in the job's region; only DescribeSecret: its value never reaches this machine).

Each check is ok (True), a problem (False, with the fix), or could not be checked (None:
the caller lacks the read permission, or the API is not there). Exit codes: 0 no
problem; 2 a check found a config/account problem; 3 AWS could not be reached.

Read-only calls only. The trust-policy reading and the quota-name matching are by hand:
no AWS library exposes them.
"""

from __future__ import annotations

import json
import urllib.parse
from dataclasses import asdict, dataclass
from typing import Any

from launcher.aws import client, split_s3
from launcher.errors import ConfigError
from launcher.validate import missing_sections

SAGEMAKER_PRINCIPAL = "sagemaker.amazonaws.com"


@dataclass
class Check:
    name: str
    ok: bool | None  # None: could not check
    detail: str
    fix: str | None = None
    unreachable: bool = False  # AWS itself could not be reached (exit 3)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def line(self) -> str:
        mark = {True: "ok  ", False: "FAIL", None: "??  "}[self.ok]
        text = f"[{mark}] {self.name}: {self.detail}"
        return text + (f"\n         fix: {self.fix}" if self.fix and self.ok is not True else "")


def exit_code(checks: list[Check]) -> int:
    if any(c.unreachable for c in checks):
        return 3
    return 2 if any(c.ok is False for c in checks) else 0


def _error(exc: Exception) -> tuple[str, str]:
    from botocore.exceptions import ClientError

    if isinstance(exc, ClientError):
        err = exc.response.get("Error", {})
        return err.get("Code", "Unknown"), err.get("Message", str(exc))
    return type(exc).__name__, str(exc)


def _unchecked(name: str, exc: Exception, permission: str) -> Check:
    """A read the caller may not make: not a problem with the launch, but not a pass either.
    A connection failure is different: AWS could not be reached at all (exit 3)."""
    from botocore.exceptions import BotoCoreError

    code, msg = _error(exc)
    if isinstance(exc, BotoCoreError):
        return Check(name, None, f"AWS could not be reached ({msg})", "check the network and the region",
                     unreachable=True)
    return Check(name, None, f"could not check ({code}: {msg})", f"allow {permission} to let preflight check this")


def _is(exc: Exception, *codes: str) -> bool:
    return _error(exc)[0] in codes


# --------------------------------------------------------------------------- the checks

def check_identity(sts) -> tuple[Check, dict | None]:
    from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

    try:
        ident = sts.get_caller_identity()
    except NoCredentialsError:
        return Check("credentials", False, "no AWS credentials found",
                     "run `aws configure` or `aws sso login`, or set AWS_PROFILE", unreachable=True), None
    except ClientError as exc:
        code, msg = _error(exc)
        return Check("credentials", False, f"AWS refused the credentials ({code}: {msg})",
                     "refresh them (aws sso login, or new keys)", unreachable=True), None
    except BotoCoreError as exc:
        return Check("credentials", False, f"AWS could not be reached: {exc}",
                     "check the network, the region and AWS_ENDPOINT_URL", unreachable=True), None
    return Check("credentials", True, f"{ident['Arn']} (account {ident['Account']})"), ident


def _policy(doc) -> dict:
    """GetRole's AssumeRolePolicyDocument: a dict from boto3, URL-encoded JSON on the wire."""
    if isinstance(doc, str):
        doc = json.loads(urllib.parse.unquote(doc))
    return doc or {}


def _listed(value) -> list:
    return value if isinstance(value, list) else [value] if value is not None else []


def trusts_sagemaker(doc) -> bool:
    for st in _listed(_policy(doc).get("Statement")):
        actions = _listed(st.get("Action"))
        principal = st.get("Principal") or {}
        services = _listed(principal.get("Service")) if isinstance(principal, dict) else []
        if (st.get("Effect") == "Allow" and any(a in ("sts:AssumeRole", "sts:*", "*") for a in actions)
                and SAGEMAKER_PRINCIPAL in services):
            return True
    return False


def check_role(iam, role_arn: str, ident: dict) -> tuple[list[Check], dict | None]:
    """The role exists, in the caller's account, and trusts SageMaker."""
    account = role_arn.split(":")[4]
    name = role_arn.rsplit("/", 1)[-1]
    if account != ident["Account"]:
        return [Check("role", False, f"{role_arn} is in account {account}, the credentials in {ident['Account']}",
                      "SageMaker takes a role of the account that creates the job: use one of "
                      f"account {ident['Account']}, or credentials of {account}")], None
    try:
        role = iam.get_role(RoleName=name)["Role"]
    except Exception as exc:
        if _is(exc, "NoSuchEntity"):
            return [Check("role", False, f"{role_arn} does not exist",
                          "create it (IAM > Roles > SageMaker execution role) or fix aws.role")], None
        return [_unchecked("role", exc, "iam:GetRole")], None
    checks = [Check("role", True, f"{role['Arn']} exists")]
    if trusts_sagemaker(role.get("AssumeRolePolicyDocument")):
        checks.append(Check("role trust", True, f"{SAGEMAKER_PRINCIPAL} may assume it"))
    else:
        services = sorted({s for st in _listed(_policy(role.get("AssumeRolePolicyDocument")).get("Statement"))
                           for s in _listed((st.get("Principal") or {}).get("Service")
                                            if isinstance(st.get("Principal"), dict) else None)})
        checks.append(Check("role trust", False,
                            f"its trust policy does not let {SAGEMAKER_PRINCIPAL} assume it"
                            + (f" (it trusts {', '.join(services)})" if services else ""),
                            f'add a statement: {{"Effect": "Allow", "Principal": {{"Service": '
                            f'"{SAGEMAKER_PRINCIPAL}"}}, "Action": "sts:AssumeRole"}}'))
    return checks, role


def caller_principal(ident: dict) -> str | None:
    """The ARN SimulatePrincipalPolicy takes: a user or role, not an STS session (None: root)."""
    arn = ident["Arn"]
    if arn.endswith(":root"):
        return None
    if ":assumed-role/" in arn:
        partition = arn.split(":")[1]
        role = arn.split(":assumed-role/")[1].split("/")[0]
        return f"arn:{partition}:iam::{ident['Account']}:role/{role}"
    return arn


def check_pass_role(iam, role_arn: str, ident: dict) -> Check:
    name = "iam:PassRole"
    principal = caller_principal(ident)
    if principal is None:
        return Check(name, True, "the account root may pass any role")
    try:
        result = iam.simulate_principal_policy(
            PolicySourceArn=principal, ActionNames=["iam:PassRole"], ResourceArns=[role_arn],
            ContextEntries=[{"ContextKeyName": "iam:PassedToService", "ContextKeyType": "string",
                             "ContextKeyValues": [SAGEMAKER_PRINCIPAL]}])
    except Exception as exc:
        # Roles behind SSO often lack iam:SimulatePrincipalPolicy; that is not a launch problem.
        return _unchecked(name, exc, "iam:SimulatePrincipalPolicy on your own principal")
    decision = result["EvaluationResults"][0]["EvalDecision"]
    if decision == "allowed":
        return Check(name, True, f"{principal} may pass {role_arn} to SageMaker")
    return Check(name, False, f"{principal} may not pass {role_arn} ({decision})",
                 f'attach a policy allowing "iam:PassRole" on {role_arn} '
                 f'(condition iam:PassedToService = {SAGEMAKER_PRINCIPAL})')


def bucket_region(location: str | None) -> str:
    """GetBucketLocation's answer: empty for us-east-1, and the legacy "EU" for eu-west-1."""
    return {None: "us-east-1", "": "us-east-1", "EU": "eu-west-1"}.get(location, location)


def check_bucket(s3, uri: str, region: str) -> Check:

    bucket, _ = split_s3(uri)
    name = "bucket"
    try:
        where = bucket_region(s3.get_bucket_location(Bucket=bucket).get("LocationConstraint"))
    except Exception as exc:
        if _is(exc, "NoSuchBucket", "404"):
            return Check(name, False, f"s3://{bucket} does not exist",
                         f"create it in {region} (aws s3 mb s3://{bucket} --region {region}) or fix output.s3_uri")
        return _unchecked(name, exc, f"s3:GetBucketLocation on {bucket}")
    if where != region:
        return Check(name, False, f"s3://{bucket} is in {where}, the job runs in {region}",
                     f"use a bucket in {region} (SageMaker reads and writes the job's S3 data in its own region), "
                     f"or set aws.region: {where}")
    return Check(name, True, f"s3://{bucket} exists in {region}")


def quota_name(instance_type: str, spot: bool) -> str:
    return f"{instance_type} for {'spot ' if spot else ''}training job usage"


def check_quota(quotas, instance_type: str, count: int, spot: bool) -> Check:
    """Service Quotas names SageMaker's training quotas '<instance> for training job usage'
    (and '... for spot training job usage'); the applied value is what the account may run."""
    wanted = quota_name(instance_type, spot)
    name = "instance quota"
    try:
        # Applied values first; a quota never changed may be listed only among the defaults.
        found = _find_quota(quotas, "list_service_quotas", wanted) or _find_quota(
            quotas, "list_aws_default_service_quotas", wanted)
    except Exception as exc:
        return _unchecked(name, exc, "servicequotas:ListServiceQuotas")
    if found is None:
        return Check(name, None, f"could not check: no quota named '{wanted}' in this region",
                     "look it up in the console: Service Quotas > Amazon SageMaker")
    value = int(found["Value"])
    if value < count:
        return Check(name, False, f"'{wanted}' is {value}, the job needs {count}",
                     f"request {count}: aws service-quotas request-service-quota-increase --service-code sagemaker "
                     f"--quota-code {found['QuotaCode']} --desired-value {count} (or pick another instance type)")
    return Check(name, True, f"'{wanted}' is {value} (the job needs {count}; running jobs on it count too)")


def _find_quota(quotas, operation: str, wanted: str) -> dict | None:
    for page in quotas.get_paginator(operation).paginate(ServiceCode="sagemaker"):
        for q in page.get("Quotas", []):
            if q.get("QuotaName") == wanted:
                return q
    return None


def check_secret(secrets_for, arn: str | None, region: str) -> Check:
    """DescribeSecret only: the token's value never reaches this machine."""
    name = "hf token secret"
    if not arn:
        return Check(name, True, "none configured (public models need none; gated ones need aws.hf_token_secret)")
    where = arn.split(":")[3]
    if where != region:
        return Check(name, False, f"{arn} is in {where}, the job runs in {region}",
                     f"replicate the secret to {region} (Secrets Manager > Replicate) and use that ARN")
    try:
        desc = secrets_for(where).describe_secret(SecretId=arn)
    except Exception as exc:
        if _is(exc, "ResourceNotFoundException"):
            return Check(name, False, f"{arn} does not exist",
                         f"create it: aws secretsmanager create-secret --name hf-token --region {region} "
                         "--secret-string hf_... ; then put its ARN in aws.hf_token_secret")
        return _unchecked(name, exc, "secretsmanager:DescribeSecret")
    if desc.get("DeletedDate"):
        return Check(name, False, f"{arn} is scheduled for deletion",
                     "restore it: aws secretsmanager restore-secret --secret-id ARN")
    return Check(name, True, f"{desc.get('Name', arn)} exists in {region}")


# --------------------------------------------------------------------------- all of them

CHECK_NAMES = ("role", "role trust", "iam:PassRole", "bucket", "instance quota", "hf token secret")


def preflight(cfg) -> list[Check]:
    """Every check, in order; read-only. `cfg` is a JobConfig (launcher.config.load_config)."""
    if missing := missing_sections(cfg):  # a config written for local runs only
        raise ConfigError(missing)
    region, profile = cfg.aws.region, cfg.aws.profile
    first, ident = check_identity(client("sts", region, profile))
    if ident is None:
        return [first] + [Check(n, None, "not checked: no access to AWS") for n in CHECK_NAMES]
    checks = [first]
    iam = client("iam", region, profile)
    role_checks, role = check_role(iam, cfg.aws.role, ident)
    checks += role_checks
    checks.append(check_pass_role(iam, role["Arn"], ident) if role
                  else Check("iam:PassRole", None, "not checked: the role is not usable"))
    checks.append(check_bucket(client("s3", region, profile), cfg.output.s3_uri, region))
    checks.append(check_quota(client("service-quotas", region, profile), cfg.compute.instance_type,
                              cfg.compute.instance_count, cfg.compute.spot))
    checks.append(check_secret(lambda r: client("secretsmanager", r, profile), cfg.aws.hf_token_secret, region))
    return checks


def gate(cfg, info=print) -> int:
    """`launch --preflight`: print each check, return the exit code (0: go on and launch)."""
    checks = preflight(cfg)
    for c in checks:
        info(c.line())
    return exit_code(checks)
