# Three buckets, uniform access, no public access: models (the published serving packages; versioned, so
# that an overwritten or deleted object can be recovered), MLflow's artifacts, and Ray's (datasets,
# checkpoints, run storage). Names are global: prefixed with the project.
locals {
  buckets = {
    models = "${var.project_id}-${var.name}-models"
    mlflow = "${var.project_id}-${var.name}-mlflow"
    ray    = "${var.project_id}-${var.name}-ray"
  }
}

resource "google_storage_bucket" "logs" {
  name                        = "${var.project_id}-${var.name}-access-logs"
  location                    = var.region
  uniform_bucket_level_access = true
  public_access_prevention    = "enforced"
  #checkov:skip=CKV_GCP_62:this is the access-log bucket itself; logging it into itself would loop
  versioning {
    enabled = true
  }
  lifecycle_rule {
    condition {
      age = 365
    }
    action {
      type = "Delete"
    }
  }
}

resource "google_storage_bucket" "main" {
  for_each                    = local.buckets
  name                        = each.value
  location                    = var.region
  uniform_bucket_level_access = true
  public_access_prevention    = "enforced"

  versioning {
    enabled = each.key == "models" || each.key == "mlflow"
  }

  logging {
    log_bucket = google_storage_bucket.logs.name
  }

  dynamic "encryption" {
    for_each = var.kms_key == "" ? [] : [var.kms_key]
    content {
      default_kms_key_name = encryption.value
    }
  }

  # Ray's checkpoints of finished runs are re-creatable; old noncurrent versions of the others expire
  lifecycle_rule {
    condition {
      num_newer_versions = 5
      with_state         = "ARCHIVED"
    }
    action {
      type = "Delete"
    }
  }
}

resource "google_artifact_registry_repository" "images" {
  #checkov:skip=CKV_GCP_84:Google-managed encryption by default; set var.kms_key to use your own key (kms_key_name)
  location      = var.region
  repository_id = var.name # REGION-docker.pkg.dev/PROJECT/maskrcnn/{platform,mlflow}
  format        = "DOCKER"
  kms_key_name  = var.kms_key == "" ? null : var.kms_key
  description   = "The platform and MLflow images"
  docker_config {
    immutable_tags = true
  }
}
