# CI/CD's identity: GitHub Actions (release.yml) exchanges its OIDC token for the release service
# account's through Workload Identity Federation; only workflows of `var.github_repository` running on a
# version tag may. No key exists. Cloud Build's trigger runs as the same account.
resource "google_iam_workload_identity_pool" "github" {
  workload_identity_pool_id = "${var.name}-github"
  display_name              = "GitHub Actions"
}

resource "google_iam_workload_identity_pool_provider" "github" {
  #checkov:skip=CKV_GCP_125:the condition pins the sub claim to repo:<var.github_repository>:environment:production; checkov cannot resolve a variable without a default (tests/test_infra.py checks the condition)
  workload_identity_pool_id          = google_iam_workload_identity_pool.github.workload_identity_pool_id
  workload_identity_pool_provider_id = "github"
  display_name                       = "GitHub OIDC"
  attribute_mapping = {
    "google.subject"       = "assertion.sub"
    "attribute.repository" = "assertion.repository"
    "attribute.ref"        = "assertion.ref"
  }
  # only this repository's jobs in its `production` environment (release.yml's; the environment's rules admit
  # only v* tags and its reviewers): a fork, a branch or another workflow cannot ship
  attribute_condition = "assertion.sub == \"repo:${var.github_repository}:environment:production\""
  oidc {
    issuer_uri = "https://token.actions.githubusercontent.com"
  }
}

resource "google_service_account" "release" {
  account_id   = "${var.name}-release"
  display_name = "Releases from CI (GitHub Actions, Cloud Build)"
}

resource "google_service_account_iam_member" "release_from_github" {
  service_account_id = google_service_account.release.name
  role               = "roles/iam.workloadIdentityUser"
  member             = "principalSet://iam.googleapis.com/${google_iam_workload_identity_pool.github.name}/attribute.repository/${var.github_repository}"
}

# push images to the one repository, nothing else
resource "google_artifact_registry_repository_iam_member" "release" {
  location   = google_artifact_registry_repository.images.location
  repository = google_artifact_registry_repository.images.name
  role       = "roles/artifactregistry.writer"
  member     = "serviceAccount:${google_service_account.release.email}"
}

# an ID token for the IAP in front of Kubeflow (`gcloud auth print-identity-token`), minted for itself
resource "google_service_account_iam_member" "release_id_tokens" {
  service_account_id = google_service_account.release.name
  role               = "roles/iam.serviceAccountOpenIdTokenCreator"
  member             = "serviceAccount:${google_service_account.release.email}"
}
