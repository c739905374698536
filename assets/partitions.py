"""Partitions shared by the ingestion assets: one dynamic partition per landed batch.
A batch is added by the ``incoming_batches`` sensor or by ``forgeline launch --partition``."""

import dagster as dg

batches = dg.DynamicPartitionsDefinition(name="batches")
