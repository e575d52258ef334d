"""The AWS adapter: :class:`~connector_credentials.adapters.aws.secrets.Boto3SecretsPort` implements the
core's ``SecretsPort`` with boto3 (``secrets``), telling the workload identity apart (``identity``),
assuming cross-account roles (``sessions``), and turning SDK errors into the core's
``AwsFailure`` (``errors``).

May import: boto3, botocore, ``core``, ``config``, ``api``. Not the other adapters.
"""
