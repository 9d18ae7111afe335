# What the manifests' placeholders become (README: one sed over deployment/, ray/, mlflow/k8s/), and what
# the set-up commands need.
output "placeholders" {
  description = "Each placeholder in the manifests and the value that replaces it."
  value = {
    PROJECT       = var.project_id
    REGION        = var.region
    MODELS_BUCKET = google_storage_bucket.main["models"].name
    MLFLOW_BUCKET = google_storage_bucket.main["mlflow"].name
    RAY_BUCKET    = google_storage_bucket.main["ray"].name
  }
}

output "get_credentials" {
  description = "The command that points kubectl at the cluster."
  value       = "gcloud container clusters get-credentials ${google_container_cluster.main.name} --region ${var.region} --project ${var.project_id}"
}

output "image_repository" {
  description = "Where the images go: platform and mlflow."
  value       = "${var.region}-docker.pkg.dev/${var.project_id}/${google_artifact_registry_repository.images.repository_id}"
}

output "service_accounts" {
  description = "Google service account e-mails by account id (the manifests' iam.gke.io/gcp-service-account)."
  value       = { for id, sa in google_service_account.workload : id => sa.email }
}

output "mlflow_db" {
  description = "Cloud SQL for MLflow: the mlflow-db Secret's host and database, and where the password is."
  value = {
    host            = google_sql_database_instance.mlflow.private_ip_address
    database        = google_sql_database.mlflow.name
    username        = google_sql_user.mlflow.name
    password_secret = google_secret_manager_secret.mlflow_db.secret_id
  }
}

output "github_actions" {
  description = "The repository variables release.yml reads (GitHub: Settings > Secrets and variables > Actions > Variables)."
  value = {
    GCP_PROJECT                    = var.project_id
    GCP_REGION                     = var.region
    GCP_WORKLOAD_IDENTITY_PROVIDER = google_iam_workload_identity_pool_provider.github.name
    GCP_RELEASE_SERVICE_ACCOUNT    = google_service_account.release.email
    BINAUTHZ_ATTESTOR              = google_binary_authorization_attestor.release.id
    BINAUTHZ_KEY_VERSION           = data.google_kms_crypto_key_version.attestations.id
  }
}

output "package_signing_key" {
  description = "The Cloud KMS key version that may sign serving packages: release promote --signing-key gcpkms://<this>."
  value       = "gcpkms://${google_kms_crypto_key.packages.id}/cryptoKeyVersions/1"
}
