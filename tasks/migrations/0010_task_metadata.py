from django.db import migrations

import tasks.fields


class Migration(migrations.Migration):
    dependencies = [
        ("tasks", "0009_asset"),
    ]

    operations = [
        migrations.AddField(
            model_name="task",
            name="metadata",
            field=tasks.fields.JSONField(blank=True, default=dict),
        ),
    ]
