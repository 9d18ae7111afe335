# Least privilege: one Google service account per workload, each with roles on its own buckets only, each
# usable only by the Kubernetes ServiceAccounts listed here (Workload Identity). The account ids are the
# ones the manifests' iam.gke.io/gcp-service-account annotations name (a test checks that they agree).
locals {
  # Google service account id -> the Kubernetes ServiceAccounts ("namespace/name") that act as it
  workload_identities = {
    "maskrcnn-predictor" = ["models/maskrcnn-predictor"]              # deployment/base/serviceaccount.yaml
    "maskrcnn-training"  = ["ray/ray-worker"]                         # ray/serviceaccount.yaml
    "mlflow"             = ["mlflow/mlflow"]                          # mlflow/k8s/overlays/gcs
    "maskrcnn-pipeline"  = var.kubeflow_pipeline_service_accounts     # the KFP steps (annotate them: README)
  }
  # (account, bucket, role): what each workload may do, and where
  bucket_roles = [
    { account = "maskrcnn-predictor", bucket = "models", role = "roles/storage.objectViewer" },  # storage initializer reads packages
    { account = "maskrcnn-training", bucket = "ray", role = "roles/storage.objectUser" },         # datasets, checkpoints
    { account = "mlflow", bucket = "mlflow", role = "roles/storage.objectUser" },                # --serve-artifacts
    { account = "maskrcnn-pipeline", bucket = "models", role = "roles/storage.objectCreator" },  # publish (create only)
    { account = "maskrcnn-pipeline", bucket = "models", role = "roles/storage.objectViewer" },   # read back, verify
    { account = "maskrcnn-pipeline", bucket = "ray", role = "roles/storage.objectUser" },        # prepare, train
  ]
  wi_members = flatten([
    for account, subjects in local.workload_identities : [
      for subject in subjects : { account = account, subject = subject }
    ]
  ])
  node_roles = ["roles/logging.logWriter", "roles/monitoring.metricWriter", "roles/monitoring.viewer",
  "roles/stackdriver.resourceMetadata.writer"]
}

resource "google_service_account" "workload" {
  for_each     = local.workload_identities
  account_id   = each.key
  display_name = "${each.key} (GKE Workload Identity)"
}

resource "google_storage_bucket_iam_member" "workload" {
  for_each = { for r in local.bucket_roles : "${r.account}/${r.bucket}/${r.role}" => r }
  bucket   = google_storage_bucket.main[each.value.bucket].name
  role     = each.value.role
  member   = "serviceAccount:${google_service_account.workload[each.value.account].email}"
}

resource "google_service_account_iam_member" "workload_identity" {
  for_each           = { for m in local.wi_members : "${m.account}/${m.subject}" => m }
  service_account_id = google_service_account.workload[each.value.account].name
  role               = "roles/iam.workloadIdentityUser"
  member             = "serviceAccount:${var.project_id}.svc.id.goog[${each.value.subject}]"
}

# The nodes' own identity: logs, metrics, and pulling images; nothing else (not the default compute
# account, which has Editor)
resource "google_service_account" "nodes" {
  account_id   = "${var.name}-nodes"
  display_name = "GKE nodes of ${var.name}"
}

resource "google_project_iam_member" "nodes" {
  for_each = toset(local.node_roles)
  project  = var.project_id
  role     = each.value
  member   = "serviceAccount:${google_service_account.nodes.email}"
}

resource "google_artifact_registry_repository_iam_member" "nodes" {
  location   = google_artifact_registry_repository.images.location
  repository = google_artifact_registry_repository.images.name
  role       = "roles/artifactregistry.reader"
  member     = "serviceAccount:${google_service_account.nodes.email}"
}
