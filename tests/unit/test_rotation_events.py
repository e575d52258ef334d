"""deploy/iam/rotation-events.yaml (EventBridge rule, SQS queue, queue policy) and the SQS statement of
deploy/iam/policy.json agree with each other and with what the operator's queue consumer does."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from connector_credentials.adapters.aws.rotation_queue import IAM_ACTIONS

IAM = Path(__file__).resolve().parents[2] / "deploy" / "iam"

#: The IAM actions of the rotation-queue consumer (CCRED_ROTATION_QUEUE_URL): it long-polls, deletes what it
#: handled (DeleteMessageBatch, which IAM authorizes as sqs:DeleteMessage), and `doctor` reads the queue's
#: attributes. Nothing else: no SendMessage, no PurgeQueue.
OPERATOR_SQS_ACTIONS = set(IAM_ACTIONS)

#: The example of Secrets Manager's documentation ("Secret Label Updated event").
SAMPLE_EVENT: dict[str, Any] = {
    "version": "0",
    "id": "6a7e8feb-b491-4cf7-a9f1-bf3703467718",
    "detail-type": "Secret Label Updated",
    "source": "aws.secretsmanager",
    "account": "012345678901",
    "time": "2024-02-06T16:43:48Z",
    "region": "us-west-2",
    "resources": ["arn:aws:secretsmanager:us-west-2:012345678901:secret:mySecret-a1b2c3"],
    "detail": {"name": "mySecret", "labelUpdated": "AWSCURRENT", "versionId": "a1b2c3d4-5678-90ab-cdef-EXAMPLE11111"},
}


@pytest.fixture(scope="module")
def template() -> dict[str, Any]:
    # Plain safe_load: the template uses the long intrinsic forms ({"Fn::GetAtt": ...}), no !tags.
    loaded: dict[str, Any] = yaml.safe_load((IAM / "rotation-events.yaml").read_text())
    return loaded


def resources_of_type(template: dict[str, Any], kind: str) -> dict[str, dict[str, Any]]:
    return {name: r for name, r in template["Resources"].items() if r["Type"] == kind}


def only(template: dict[str, Any], kind: str) -> tuple[str, dict[str, Any]]:
    [(name, resource)] = resources_of_type(template, kind).items()
    return name, resource["Properties"]


def resolve(node: Any, template: dict[str, Any], parameters: dict[str, str]) -> Any:
    """CloudFormation's Ref (to a parameter), Fn::Equals and Fn::If, enough to evaluate the rule's pattern."""
    if isinstance(node, list):
        return [resolve(item, template, parameters) for item in node]
    if not isinstance(node, dict):
        return node
    if set(node) == {"Ref"} and node["Ref"] in template["Parameters"]:
        return parameters.get(node["Ref"], template["Parameters"][node["Ref"]].get("Default"))
    if set(node) == {"Fn::Equals"}:
        left, right = resolve(node["Fn::Equals"], template, parameters)
        return left == right
    if set(node) == {"Fn::If"}:
        condition, if_true, if_false = node["Fn::If"]
        holds = resolve(template["Conditions"][condition], template, parameters)
        return resolve(if_true if holds else if_false, template, parameters)
    return {key: resolve(value, template, parameters) for key, value in node.items()}


def matches(pattern: dict[str, Any], event: dict[str, Any]) -> bool:
    """EventBridge matching for what the rule uses: nested objects, lists of values, ``{"prefix": ...}``."""
    for key, wanted in pattern.items():
        if key not in event:
            return False
        if isinstance(wanted, dict):
            if not isinstance(event[key], dict) or not matches(wanted, event[key]):
                return False
            continue
        values = event[key] if isinstance(event[key], list) else [event[key]]
        if not any(_matches_one(rule, value) for rule in wanted for value in values):
            return False
    return True


def _matches_one(rule: Any, value: Any) -> bool:
    if isinstance(rule, dict):
        [(operator, operand)] = rule.items()
        assert operator == "prefix", f"no matcher for {operator} here"
        return isinstance(value, str) and value.startswith(operand)
    return bool(rule == value)


def pattern(template: dict[str, Any], **parameters: str) -> dict[str, Any]:
    _, rule = only(template, "AWS::Events::Rule")
    resolved: dict[str, Any] = resolve(rule["EventPattern"], template, parameters)
    return resolved


def event_for(name: str, **changes: str) -> dict[str, Any]:
    event = copy.deepcopy(SAMPLE_EVENT)
    event["detail"]["name"] = name
    event.update(changes)
    return event


def test_the_rule_matches_secret_label_updated_events(template: dict[str, Any]) -> None:
    every = pattern(template)  # SecretNamePrefix defaults to "": every secret of the region
    assert matches(every, SAMPLE_EVENT)
    assert matches(every, event_for("xpander/prod/slack-bot-token"))
    assert not matches(every, event_for("mySecret", **{"detail-type": "AWS API Call via CloudTrail"}))
    assert not matches(every, event_for("mySecret", source="aws.ssm"))


def test_the_prefix_narrows_the_rule_to_the_secret_names(template: dict[str, Any]) -> None:
    prod = pattern(template, SecretNamePrefix="xpander/prod/")
    assert matches(prod, event_for("xpander/prod/slack-bot-token"))
    assert not matches(prod, SAMPLE_EVENT)
    assert not matches(prod, event_for("xpander/staging/slack-bot-token"))
    assert matches(pattern(template, SecretNamePrefix="my"), SAMPLE_EVENT)
    # The pattern with a prefix is the pattern without one, plus the prefix: nothing else differs.
    assert {k: v for k, v in prod.items() if k != "detail"} == pattern(template)
    assert json.loads(json.dumps(prod))["detail"] == {"name": [{"prefix": "xpander/prod/"}]}


def test_the_rule_sends_the_event_itself_to_the_queue_on_the_default_bus(template: dict[str, Any]) -> None:
    queue, _ = only(template, "AWS::SQS::Queue")
    _, rule = only(template, "AWS::Events::Rule")
    assert rule.get("EventBusName", "default") == "default"  # where AWS services publish
    assert rule["State"] == "ENABLED"
    [target] = rule["Targets"]
    assert target["Arn"] == {"Fn::GetAtt": [queue, "Arn"]}
    # The consumer parses the event's JSON from the message body: no transformer may reshape it.
    assert not {"Input", "InputPath", "InputTransformer"} & set(target)


def test_only_the_rule_may_send_and_only_the_operator_receive(template: dict[str, Any]) -> None:
    queue, _ = only(template, "AWS::SQS::Queue")
    rule, _ = only(template, "AWS::Events::Rule")
    _, queue_policy = only(template, "AWS::SQS::QueuePolicy")
    assert queue_policy["Queues"] == [{"Ref": queue}]
    statements = queue_policy["PolicyDocument"]["Statement"]
    assert all(s["Effect"] == "Allow" and s["Resource"] == {"Fn::GetAtt": [queue, "Arn"]} for s in statements)
    [send] = [s for s in statements if s["Principal"] == {"Service": "events.amazonaws.com"}]
    assert send["Action"] == "sqs:SendMessage"
    assert send["Condition"] == {"ArnEquals": {"aws:SourceArn": {"Fn::GetAtt": [rule, "Arn"]}}}
    [receive] = [s for s in statements if s is not send]
    assert receive["Principal"] == {"AWS": {"Ref": "OperatorRoleArn"}}
    assert set(receive["Action"]) == OPERATOR_SQS_ACTIONS


def test_the_queue_long_polls_encrypts_and_keeps_events_briefly(template: dict[str, Any]) -> None:
    queue, properties = only(template, "AWS::SQS::Queue")
    assert properties["QueueName"] == {"Ref": "QueueName"}
    assert properties["ReceiveMessageWaitTimeSeconds"] == 20
    assert properties["SqsManagedSseEnabled"] is True
    # A missed event is covered by polling: an hour at most (the default is 4 days).
    assert 60 <= properties["MessageRetentionPeriod"] <= 3600
    assert "FifoQueue" not in properties  # a standard queue: EventBridge sends without a group id
    assert template["Outputs"]["QueueUrl"]["Value"] == {"Ref": queue}  # Ref of a queue is its URL
    assert template["Outputs"]["QueueArn"]["Value"] == {"Fn::GetAtt": [queue, "Arn"]}


def test_every_reference_names_a_parameter_or_a_resource(template: dict[str, Any]) -> None:
    names = set(template["Parameters"]) | set(template["Resources"])
    found: list[str] = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            if "Ref" in node:
                found.append(node["Ref"])
            if "Fn::GetAtt" in node:
                found.append(node["Fn::GetAtt"][0])
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for item in node:
                walk(item)

    walk(template["Resources"])
    walk(template["Outputs"])
    assert found
    assert set(found) <= names
    assert {"QueueName", "OperatorRoleArn", "SecretNamePrefix"} <= set(template["Parameters"])


def test_the_role_policy_grants_the_operator_s_sqs_calls_on_the_queue_only() -> None:
    policy = json.loads((IAM / "policy.json").read_text())
    [statement] = [s for s in policy["Statement"] if s["Sid"] == "ReceiveRotationEvents"]
    assert statement["Effect"] == "Allow" and "Condition" not in statement
    assert sorted(statement["Action"]) == sorted(OPERATOR_SQS_ACTIONS)
    assert statement["Resource"] == "arn:aws:sqs:REGION:ACCOUNT_ID:QUEUE_NAME"
    others = [s for s in policy["Statement"] if s is not statement]
    assert not [s["Sid"] for s in others if "sqs:" in json.dumps(s["Action"])]
