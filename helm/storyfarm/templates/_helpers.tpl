{{/* Names and labels shared by every object of a release. */}}
{{- define "storyfarm.name" -}}
{{- .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "storyfarm.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "storyfarm.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/name: {{ include "storyfarm.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{/* Selector labels of one component (coordinator, worker, migrations). */}}
{{- define "storyfarm.selectorLabels" -}}
app.kubernetes.io/name: {{ include "storyfarm.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "storyfarm.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "storyfarm.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "storyfarm.secretName" -}}
{{- if .Values.secrets.existingSecret -}}
{{- .Values.secrets.existingSecret -}}
{{- else -}}
{{- include "storyfarm.fullname" . -}}
{{- end -}}
{{- end -}}

{{- define "storyfarm.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{- define "storyfarm.workerImage" -}}
{{- if eq .Values.worker.device "cpu" -}}
{{- include "storyfarm.image" . -}}
{{- else -}}
{{- $repo := default .Values.image.repository .Values.worker.image.repository -}}
{{- $tag := default (printf "%s-cuda" (default .Chart.AppVersion .Values.image.tag)) .Values.worker.image.tag -}}
{{- printf "%s:%s" $repo $tag -}}
{{- end -}}
{{- end -}}

{{/* Environment of the coordinator and the workers: the broker and the artifact store. The
database URL is the coordinator's alone (workers never touch Postgres). */}}
{{- define "storyfarm.commonEnv" -}}
- name: STORYFARM_AMQP_URL
  valueFrom:
    secretKeyRef:
      name: {{ include "storyfarm.secretName" . }}
      key: STORYFARM_AMQP_URL
- name: AWS_ACCESS_KEY_ID
  valueFrom:
    secretKeyRef:
      name: {{ include "storyfarm.secretName" . }}
      key: AWS_ACCESS_KEY_ID
- name: AWS_SECRET_ACCESS_KEY
  valueFrom:
    secretKeyRef:
      name: {{ include "storyfarm.secretName" . }}
      key: AWS_SECRET_ACCESS_KEY
- name: STORYFARM_BLOBS
  value: {{ .Values.storage.blobs | quote }}
{{- with .Values.storage.s3Endpoint }}
- name: STORYFARM_S3_ENDPOINT
  value: {{ . | quote }}
{{- end }}
- name: STORYFARM_S3_REGION
  value: {{ .Values.storage.s3Region | quote }}
{{- with .Values.storage.s3PathStyle }}
- name: STORYFARM_S3_PATH_STYLE
  value: {{ . | quote }}
{{- end }}
- name: STORYFARM_QUEUE_NAMESPACE
  value: {{ .Values.queue.namespace | quote }}
- name: STORYFARM_DELIVERY_LIMIT
  value: {{ .Values.queue.deliveryLimit | quote }}
- name: STORYFARM_FAMILIES
  value: {{ join "," .Values.queue.families | quote }}
{{- with .Values.extraEnv }}
{{ toYaml . }}
{{- end }}
{{- end -}}
