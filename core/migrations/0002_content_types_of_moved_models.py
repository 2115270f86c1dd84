from django.db import migrations

MOVED = {
    "chat": [
        "team",
        "vaultsecret",
        "custommodel",
        "tool",
        "group",
        "groupagent",
        "groupfallback",
        "apitoken",
        "execution",
        "step",
        "toolexecution",
    ],
    "approvals": ["approval", "webhookdelivery"],
}


def content_types_to_core(apps, schema_editor):
    """The moved models' content types follow them, so permissions given on them (decide_approval) and
    admin log entries keep pointing at the same rows."""
    ContentType = apps.get_model("contenttypes", "ContentType")
    for app_label, models in MOVED.items():
        for model in models:
            ContentType.objects.filter(app_label="core", model=model).delete()
            ContentType.objects.filter(app_label=app_label, model=model).update(app_label="core")


class Migration(migrations.Migration):
    dependencies = [
        ("contenttypes", "0002_remove_content_type_name"),
        ("core", "0001_models_move_to_core"),
        ("chat", "0005_models_move_to_core"),
        ("approvals", "0007_models_move_to_core"),
    ]

    operations = [migrations.RunPython(content_types_to_core, migrations.RunPython.noop)]
