# What vouches for a release, held in Cloud KMS (no private key ever leaves it):
#
# - `attestations`: the Binary Authorization attestor's key. CI (release.yml, cloudbuild.yaml) attests each
#   image it pushes; the cluster's policy admits only images this attestor attested (besides Google's
#   system images and the third-party images listed in var.binauthz_allowed_images).
# - `packages`: an Ed25519 key that may sign serving packages instead of a key file (README, "Signing with
#   Cloud KMS"): `release promote --signing-key gcpkms://<packages key version>`. The predictor verifies
#   with its public key (the ConfigMap), as with a key file.
resource "google_kms_key_ring" "release" {
  name     = "${var.name}-release"
  location = var.region
}

resource "google_kms_crypto_key" "attestations" {
  #checkov:skip=CKV_GCP_82:asymmetric signing keys cannot rotate automatically in Cloud KMS; rotate by adding a key version and the attestor's new public key
  name     = "attestations"
  key_ring = google_kms_key_ring.release.id
  purpose  = "ASYMMETRIC_SIGN"
  version_template {
    algorithm        = "EC_SIGN_P256_SHA256"
    protection_level = "HSM"
  }
  lifecycle {
    prevent_destroy = true
  }
}

resource "google_kms_crypto_key" "packages" {
  #checkov:skip=CKV_GCP_82:asymmetric signing keys cannot rotate automatically in Cloud KMS; rotate by adding a key version and its public key to the predictor's ConfigMap
  name     = "packages"
  key_ring = google_kms_key_ring.release.id
  purpose  = "ASYMMETRIC_SIGN"
  version_template {
    algorithm        = "EC_SIGN_ED25519"
    protection_level = "SOFTWARE" # Ed25519 is a software key in Cloud KMS
  }
  lifecycle {
    prevent_destroy = true
  }
}

data "google_kms_crypto_key_version" "attestations" {
  crypto_key = google_kms_crypto_key.attestations.id
}

resource "google_container_analysis_note" "release" {
  name = "${var.name}-release"
  attestation_authority {
    hint {
      human_readable_name = "Built and pushed by the release (release.yml or cloudbuild.yaml)"
    }
  }
}

resource "google_binary_authorization_attestor" "release" {
  name = "${var.name}-release"
  attestation_authority_note {
    note_reference = google_container_analysis_note.release.name
    public_keys {
      id = data.google_kms_crypto_key_version.attestations.id
      pkix_public_key {
        public_key_pem      = data.google_kms_crypto_key_version.attestations.public_key[0].pem
        signature_algorithm = data.google_kms_crypto_key_version.attestations.public_key[0].algorithm
      }
    }
  }
}

# The policy the cluster enforces (gke.tf: PROJECT_SINGLETON_POLICY_ENFORCE): an image runs only if the
# release attested it. Google-maintained system images are exempt (global evaluation mode); the third-party
# images the platform runs (KServe, Knative, Kubeflow, KubeRay, ...) by the patterns in var.binauthz_allowed_images.
resource "google_binary_authorization_policy" "release" {
  global_policy_evaluation_mode = "ENABLE"

  dynamic "admission_whitelist_patterns" {
    for_each = var.binauthz_allowed_images
    content {
      name_pattern = admission_whitelist_patterns.value
    }
  }

  default_admission_rule {
    evaluation_mode         = "REQUIRE_ATTESTATION"
    enforcement_mode        = "ENFORCED_BLOCK_AND_AUDIT_LOG"
    require_attestations_by = [google_binary_authorization_attestor.release.name]
  }
}

# The release account attests (attaches occurrences to the note, signs with the attestations key) and may
# sign packages with the packages key; nothing else may use either key.
resource "google_container_analysis_note_iam_member" "release" {
  note   = google_container_analysis_note.release.name
  role   = "roles/containeranalysis.notes.attacher"
  member = "serviceAccount:${google_service_account.release.email}"
}

resource "google_kms_crypto_key_iam_member" "attestations" {
  crypto_key_id = google_kms_crypto_key.attestations.id
  role          = "roles/cloudkms.signerVerifier"
  member        = "serviceAccount:${google_service_account.release.email}"
}

resource "google_kms_crypto_key_iam_member" "packages" {
  crypto_key_id = google_kms_crypto_key.packages.id
  role          = "roles/cloudkms.signer"
  member        = "serviceAccount:${google_service_account.workload["maskrcnn-pipeline"].email}"
}
