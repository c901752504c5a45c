"""OpenAPI schema fixes the schemathesis-based tests share."""


def homogeneous_tuples(node):
    """``prefixItems`` of identical items → plain ``items`` (same meaning, as min/maxItems stay).

    Works around schemathesis 4.32.5, which rewrites ``prefixItems`` of OpenAPI 3.1 response schemas
    into draft-4 ``items: [...]`` and then rejects that under its Draft 2020-12 validator.
    """
    if isinstance(node, list):
        return [homogeneous_tuples(child) for child in node]
    if not isinstance(node, dict):
        return node
    node = {key: homogeneous_tuples(value) for key, value in node.items()}
    prefix = node.get("prefixItems")
    if prefix and "items" not in node and all(item == prefix[0] for item in prefix):
        node["items"] = node.pop("prefixItems")[0]
    return node
