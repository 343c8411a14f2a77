import django.db.models.deletion
import django.utils.timezone
from django.db import migrations, models

import api.models


def give_each_key_a_secret(apps, schema_editor):  # noqa: ANN001, ANN201
    ApiKey = apps.get_model("api", "ApiKey")
    for key in ApiKey.objects.filter(webhook_secret=""):
        key.webhook_secret = api.models.new_webhook_secret()
        key.save(update_fields=["webhook_secret"])


class Migration(migrations.Migration):
    dependencies = [
        ("api", "0003_inpaint_previews_client_state"),
    ]

    operations = [
        migrations.AddField(
            model_name="apikey",
            name="webhook_secret",
            field=models.CharField(blank=True, default="", max_length=128),
        ),
        migrations.RunPython(give_each_key_a_secret, migrations.RunPython.noop),
        migrations.AlterField(
            model_name="apikey",
            name="webhook_secret",
            field=models.CharField(blank=True, default=api.models.new_webhook_secret, max_length=128),
        ),
        migrations.AddField(
            model_name="generation",
            name="webhook_base_url",
            field=models.CharField(blank=True, default="", max_length=512),
        ),
        migrations.AddField(
            model_name="generation",
            name="webhook_events",
            field=models.JSONField(blank=True, default=list),
        ),
        migrations.AddField(
            model_name="generation",
            name="webhook_url",
            field=models.CharField(blank=True, default="", max_length=2048),
        ),
        migrations.CreateModel(
            name="WebhookDelivery",
            fields=[
                ("id", models.BigAutoField(auto_created=True, primary_key=True, serialize=False, verbose_name="ID")),
                ("event", models.CharField(max_length=16)),
                ("url", models.CharField(max_length=2048)),
                ("msg_id", models.CharField(max_length=80, unique=True)),
                ("state", models.CharField(db_index=True, default="pending", max_length=16)),
                ("attempts", models.PositiveSmallIntegerField(default=0)),
                ("next_attempt_at", models.DateTimeField(db_index=True, default=django.utils.timezone.now)),
                ("lease_until", models.DateTimeField(blank=True, null=True)),
                ("last_status_code", models.PositiveSmallIntegerField(blank=True, null=True)),
                ("last_error", models.CharField(blank=True, default="", max_length=300)),
                ("log", models.JSONField(blank=True, default=list)),
                ("created_at", models.DateTimeField(auto_now_add=True)),
                ("delivered_at", models.DateTimeField(blank=True, null=True)),
                (
                    "generation",
                    models.ForeignKey(
                        on_delete=django.db.models.deletion.CASCADE,
                        related_name="webhook_deliveries",
                        to="api.generation",
                    ),
                ),
            ],
            options={
                "db_table": "api_webhook_delivery",
                "constraints": [models.UniqueConstraint(fields=("generation", "event"), name="one_delivery_per_event")],
            },
        ),
    ]
